"""The bad-input catalogue of launch/pretrain.py: each case is one line naming the field and
the fix, exit code 2, no traceback, and nothing already on disk touched."""
import json
import sys

import pytest

from fixtures import make_tiny_teacher, pretrain_in_process, tiny_overrides
from distil_scale import pretrain_cli


def _cli(monkeypatch, capsys, args):
    monkeypatch.setattr(sys, "argv", ["launch/pretrain.py", *args])
    with pytest.raises(SystemExit) as e:
        pretrain_cli.main()
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    return e.value.code, lines, err


@pytest.fixture(scope="module")
def bad(tmp_path_factory, tiny_teacher):
    d = tmp_path_factory.mktemp("bad")
    (d / "not.json").write_text("{ this is not json")
    (d / "contra.json").write_text(json.dumps({"train_micro_batch_size_per_gpu": 3,
                                               "zero_optimization": {"stage": 2}}))
    (d / "misspelt-top.json").write_text(json.dumps({"zero_optimisation": {"stage": 2}}))
    (d / "misspelt-inner.json").write_text(json.dumps({"zero_optimization": {
        "stage": 2, "overlap_com": False}}))
    (d / "bad.yaml").write_text("train: [unclosed\n")
    (d / "list.yaml").write_text("- a\n- b\n")
    (d / "empty.txt").write_text("")
    (d / "blank.txt").write_text("\n   \n\n")
    (d / "latin1").mkdir()
    (d / "latin1" / "a.txt").write_bytes(b"a fee of \xa315m was paid " * 30)
    (d / "latin1" / "b.txt").write_bytes(b"caf\xe9 au lait, s'il vous pla\xeet " * 30)
    (d / "nofield.jsonl").write_text('{"body": "hello"}\n' * 5)
    (d / "nomanifest").mkdir()
    (d / "nomanifest" / "train-00000.npy").write_bytes(b"")
    (d / "nomanifest" / "heldout.npy").write_bytes(b"")
    rows = [{"text": None}] + [{"text": "the river and the city " * 20}] * 3
    (d / "nulltext.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "nodata").mkdir()
    (d / "nodata" / "readme.md").write_text("no corpus here")
    (d / "noconfig").mkdir()
    from transformers import GPT2Config, GPT2LMHeadModel
    GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=1, n_head=2)).save_pretrained(
        d / "gpt2")
    # a BERT whose vocabulary is smaller than its tokenizer's
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM
    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    BertForMaskedLM(BertConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=2,
                               num_attention_heads=2, intermediate_size=64)).save_pretrained(
        d / "smallvocab")
    tok.save_pretrained(d / "smallvocab")
    make_tiny_teacher(d / "headless", layers=2, with_head=False)
    import shutil
    shutil.copytree(tiny_teacher, d / "truncated")
    w = d / "truncated" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:100_000])  # a download or copy cut short
    return d


CASES = [
    # (id, extra overrides or flags, expected message fragment)
    ("unknown-key", ["train.max_stepz=3"], "unknown config key 'train.max_stepz'"),
    ("unknown-section", ["trainer.max_steps=3"], "unknown config key 'trainer'"),
    ("wrong-type-int", ["train.max_steps=many"], "train.max_steps: expected an integer"),
    ("wrong-type-bool", ["metrics.tensorboard=2"], "metrics.tensorboard: expected true or false"),
    ("wrong-type-list", ["student.layers=a,b"], "student.layers[0]: expected an integer"),
    ("negative-lr", ["train.lr=-0.001"], "train.lr: must be > 0"),
    ("zero-temperature", ["loss.temperature=0"], "loss.temperature: must be > 0"),
    ("negative-temperature", ["loss.temperature=-2"], "loss.temperature: must be > 0"),
    ("mask-prob-high", ["masking.mlm_prob=1.0"], "masking.mlm_prob: must be in (0, 1)"),
    ("mask-prob-zero", ["masking.mlm_prob=0"], "masking.mlm_prob: must be in (0, 1)"),
    ("mask-split", ["masking.mask_frac=0.5"], "mask_frac + random_frac + keep_frac must be 1"),
    ("negative-alpha", ["loss.alpha_cos=-1"], "loss.alpha_cos: must be >= 0"),
    ("kl-positions", ["loss.kl_positions=some"], "loss.kl_positions: must be one of"),
    ("zero-steps", ["train.max_steps=0"], "train.max_steps: must be > 0"),
    ("keep-last", ["checkpoint.keep_last=0"], "checkpoint.keep_last: must be >= 1"),
    ("tiny-seq", ["data.max_seq_len=4"], "data.max_seq_len: must be >= 8"),
    ("override-syntax", ["train.max_steps"], "expected key=value"),
    ("global-batch", ["train.global_batch=10"],
     "train.global_batch: 10 is not divisible by train.micro_batch 4 x 1 process = 4"),
    ("backend", ["parallel.backend=mpi"], "parallel.backend: must be one of"),
    ("deepspeed-without-json", ["parallel.backend=deepspeed"], "needs --ds DS_JSON"),
    ("ds-not-json", ["--ds", "{d}/not.json"], "--ds: '{d}/not.json' is not valid JSON"),
    ("ds-missing", ["--ds", "{d}/none.json"], "--ds: no such file"),
    ("ds-contradicts", ["--ds", "{d}/contra.json"],
     "train_micro_batch_size_per_gpu=3 in '{d}/contra.json' contradicts train.micro_batch=4"),
    ("ds-misspelt-top-key", ["--ds", "{d}/misspelt-top.json"],
     "--ds: unknown top-level key 'zero_optimisation' in '{d}/misspelt-top.json'"),
    ("ds-misspelt-section-key", ["--ds", "{d}/misspelt-inner.json"],
     "--ds: 'zero_optimization.overlap_com' in '{d}/misspelt-inner.json' is not a DeepSpeed key"),
    ("config-missing", ["--config", "{d}/none.yaml"], "--config: no such file"),
    ("config-bad-yaml", ["--config", "{d}/bad.yaml"], "is not valid YAML"),
    ("config-not-mapping", ["--config", "{d}/list.yaml"], "must hold a mapping"),
    ("fp16-on-cpu", ["train.precision=fp16"], "train.precision: fp16 needs a CUDA GPU"),
    ("teacher-missing", ["teacher.name_or_path={d}/no/such/teacher"], "no such directory"),
    ("teacher-no-config", ["teacher.name_or_path={d}/noconfig"], "has no config.json"),
    ("teacher-not-mlm", ["teacher.name_or_path={d}/gpt2"],
     "is a 'gpt2' model; the teacher must be a masked LM of one of: bert"),
    ("teacher-truncated", ["teacher.name_or_path={d}/truncated"],
     "teacher.name_or_path: cannot read the weights in '{d}/truncated'"),
    ("teacher-headless", ["teacher.name_or_path={d}/headless", "teacher.prepare_steps=0"],
     "has no MLM head"),
    ("tokenizer-vocab", ["teacher.name_or_path={d}/smallvocab"],
     "tokens but the model's vocab_size is 1000"),
    ("student-wider", ["student.dim=128"],
     "student.init: teacher copies 64-wide weights into a 128"),
    ("student-layers", ["student.layers=0,7"], "student.layers: [0, 7] out of range"),
    ("student-deeper", ["student.n_layers=6"], "student.n_layers: 6 > the teacher's 4 layers"),
    ("seq-too-long", ["data.max_seq_len=1024"], "data.max_seq_len: 1024 exceeds the teacher's"),
    ("corpus-missing", ["data.source={d}/nothing.jsonl"], "data.source: no such file"),
    ("corpus-empty", ["data.source={d}/empty.txt"],
     "data.source: no text in '{d}/empty.txt' (empty, or only blank lines)"),
    ("corpus-blank", ["data.source={d}/blank.txt"],
     "data.source: no text in '{d}/blank.txt' (empty, or only blank lines)"),
    ("corpus-null-text", ["data.source={d}/nulltext.jsonl"],
     "data.source: a row of '{d}/nulltext.jsonl' has text=None, not text; fix or drop that row"),
    ("shards-without-manifest", ["data.source={d}/nomanifest"],
     "data.source: '{d}/nomanifest' holds shards but no manifest.json"),
    ("corpus-no-files", ["data.source={d}/nodata"], "no .txt/.jsonl/.json/.parquet files"),
    ("corpus-bad-utf8", ["data.source={d}/latin1", "data.encoding_errors=strict"],
     "is not valid UTF-8"),
    ("corpus-no-field", ["data.source={d}/nofield.jsonl"], "data.text_field: rows of"),
]


@pytest.mark.parametrize("case, args, needle", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, args, needle, bad, tiny_teacher, corpus, tmp_path, monkeypatch,
                   capsys):
    out = tmp_path / "run"
    base = tiny_overrides(tiny_teacher, corpus, out)
    args = [a.replace("{d}", str(bad)) for a in args]
    code, lines, err = _cli(monkeypatch, capsys, base + args)
    assert code == 2, err[-1500:]
    assert len(lines) == 1, err[-1500:]
    assert needle.replace("{d}", str(bad)) in lines[0]
    assert "Traceback" not in err
    assert not (out / "config.yaml").exists() and not (out / "checkpoints").exists()


def test_catalogue_is_long_enough():
    assert len(CASES) >= 30


def test_nothing_overwritten_by_a_refused_run(tmp_path, tiny_teacher, corpus):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    (out / "notes.txt").write_text("mine")
    r = pretrain_in_process(tiny_overrides(tiny_teacher, corpus, out))
    assert r.returncode == 2 and "holds another run" in r.stderr
    # a bad input with --overwrite fails before the old run is cleared
    r = pretrain_in_process(tiny_overrides(tiny_teacher, corpus, out)
                     + ["--overwrite", "teacher.name_or_path=/no/such/dir"])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert (out / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert (out / "notes.txt").read_text() == "mine"
