"""Console scripts (pyproject's [project.scripts]): each runs what its launch/*.py runs, with
the same one-line errors. Imports stay inside, so ``--help`` does not load torch's world."""
from __future__ import annotations

from .errors import main_guard


def finetune() -> None:
    from .glue.cli import finetune_main

    main_guard(finetune_main)()


def distill_task() -> None:
    from .glue.cli import distill_main

    main_guard(distill_main)()


def report() -> None:
    from .glue.report import report_main

    main_guard(report_main)()


def plan() -> None:
    from .tools.plan import main

    main_guard(main)()


def gpu_check() -> None:
    from .tools.gpu_check import main

    main_guard(main)()


def bench() -> None:
    from .tools.bench import main

    main()  # already guarded


def study() -> None:
    from .tools.study import main

    main()  # already guarded


def prepare_data() -> None:
    from .data.prepare_cli import main

    main()  # already guarded
