"""A non-BERT family on the multi-process engines: a RoBERTa teacher, a narrow RoBERTa student
with every objective term on, two real ranks on gloo under DDP, FSDP2 and DeepSpeed ZeRO-2;
checkpointed, exported and read back by ``transformers.pipeline("fill-mask")``."""
import pytest

from fixtures import (EVERY_TERM, REPO, check_family_export, check_terms, launch_cmd, run,
                      save_family_teacher, tiny_overrides, write_corpus)


@pytest.mark.slow
@pytest.mark.parametrize("launcher,backend", [("torchrun", ["parallel.backend=ddp"]),
                                              ("torchrun", ["parallel.backend=fsdp"]),
                                              ("deepspeed", ["--ds", "ds_configs/cpu.json"])])
def test_roberta_narrow_every_term_on_two_ranks(launcher, backend, tmp_path):
    teacher = save_family_teacher("roberta", tmp_path / "teacher")
    corpus = write_corpus(tmp_path / "corpus.jsonl", n_docs=120)
    out = tmp_path / "run"
    args = tiny_overrides(teacher, corpus, out, **EVERY_TERM,
                          **{"train.max_steps": 4, "train.precision": "bf16",
                             "train.micro_batch": 2, "checkpoint.every_steps": 2})
    backend = [str(REPO / a) if a.endswith(".json") else a for a in backend]
    log = run(launch_cmd(launcher, 2, [*backend, *args]))
    assert " x2 " in log, log[-3000:]
    check_terms(out, 4)
    assert (out / "checkpoints" / "step-00000004" / "COMPLETE").is_file()
    check_family_export(out, "roberta")
