import json
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.numpy import load_file

from biovfm.config import pretrain_job, to_json
from biovfm.data.store import load_store, write_store
from biovfm.data.synthetic import MODALITIES, generate_corpus
from biovfm.train.checkpoint import CheckpointMismatch, load_state, save_state
from biovfm.train.engine import fingerprint, pretrain
from biovfm.train.loader import batch_indices
from biovfm.train.schedule import warmup_cosine


def tiny_job(params, mlflow_uri, method="mae", **train):
    job = pretrain_job(params, method, "femto", "all", 60, 0)
    return replace(job, tracking={"uri": mlflow_uri, "experiment": "test"}, train=replace(job.train, **train))


@pytest.fixture
def synthetic_corpus(tmp_path) -> Path:
    """A small corpus of the synthetic benchmark's images (structure for DINO to find, unlike noise)."""
    images, modality = generate_corpus(240, MODALITIES, size=16, seed=0)
    write_store(tmp_path / "synthetic_corpus", images, np.full(len(images), "synthetic"), np.asarray(modality))
    return tmp_path / "synthetic_corpus"


def test_batch_indices_cover_each_epoch_once():
    seen = np.concatenate([batch_indices(10, 4, s, seed=3).numpy() for s in range(5)])  # 20 draws = 2 epochs
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert np.array_equal(batch_indices(10, 4, 2, seed=3), batch_indices(10, 4, 2, seed=3))


def test_warmup_cosine_shape():
    lrs = [warmup_cosine(s, 100, 1.0, 10) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[-1] < 0.01 and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_store_subsets_are_nested_prefixes(corpus_dir):
    store = load_store(corpus_dir)
    small, large = store.subset(["xray", "ct"], 20, seed=0), store.subset(["xray", "ct"], 60, seed=0)
    assert set(small) <= set(large)
    assert set(store.index.loc[large, "modality"]) == {"xray", "ct"}
    with pytest.raises(ValueError, match="a subset of 65 was requested"):
        store.subset(["xray", "ct"], 65)


def test_pretrain_writes_outputs_and_is_deterministic(params, corpus_dir, mlflow_uri, tmp_path):
    job = tiny_job(params, mlflow_uri, steps=6, checkpoint_every=3, threads=1)
    a = pretrain(job, corpus_dir, tmp_path / "a")
    b = pretrain(job, corpus_dir, tmp_path / "b")
    for name in ("checkpoint.safetensors", "history.csv", "config.json", "run.json"):
        assert (tmp_path / "a" / name).is_file()
    assert not list((tmp_path / "a").glob("*state-*"))  # saved states are removed once the run is complete
    wa, wb = load_file(tmp_path / "a" / "checkpoint.safetensors"), load_file(tmp_path / "b" / "checkpoint.safetensors")
    assert all(np.array_equal(wa[k], wb[k]) for k in wa)
    assert a["final_loss"] == b["final_loss"] and a["images_seen"] == 6 * 32
    assert a["flops_per_image"] > 0 and a["train_flops"] > a["flops_per_image"] * a["images_seen"]
    assert a["params_encoder"] > 0 and a["params_paper"] > a["params_encoder"]


def test_resume_refuses_a_foreign_checkpoint(params, corpus_dir, mlflow_uri, tmp_path):
    job = tiny_job(params, mlflow_uri, steps=4)
    save_state(tmp_path, {"run_id": "mae/other/all/n9/s0", "fingerprint": "x", "step": 2})
    with pytest.raises(CheckpointMismatch, match="mae/other/all/n9/s0.*cannot resume run 'mae/femto/all/n60/s0'"):
        pretrain(job, corpus_dir, tmp_path)
    other_config = replace(job, train=replace(job.train, base_lr=1.0))
    save_state(tmp_path, {"run_id": job.run_id, "fingerprint": fingerprint(other_config), "step": 3})
    with pytest.raises(CheckpointMismatch, match=f"config '{fingerprint(other_config)}'.*config '{fingerprint(job)}'"):
        pretrain(job, corpus_dir, tmp_path)


def test_runtime_settings_do_not_change_the_fingerprint(params, mlflow_uri):
    job = tiny_job(params, mlflow_uri)
    moved = replace(job, train=replace(job.train, nproc=4, threads=8, checkpoint_every=7, log_every=3, compile=True))
    assert fingerprint(moved) == fingerprint(job)
    assert fingerprint(replace(job, train=replace(job.train, grad_accum=2))) != fingerprint(job)


def test_corrupt_checkpoint_falls_back_to_the_previous_one(tmp_path):
    run, fp = "mae/femto/all/n60/s0", "abc"
    for step in (2, 4, 6):
        save_state(tmp_path, {"run_id": run, "fingerprint": fp, "step": step, "w": torch.full((3,), float(step))})
    assert sorted(p.name for p in tmp_path.glob("state-*.pt")) == ["state-000000004.pt", "state-000000006.pt"]
    assert load_state(tmp_path, run, fp)["step"] == 6
    newest = tmp_path / "state-000000006.pt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a flipped bit that torch.load itself might not notice
    newest.write_bytes(bytes(data))
    logs = []
    state = load_state(tmp_path, run, fp, log=logs.append)
    assert state["step"] == 4 and torch.equal(state["w"], torch.full((3,), 4.0))
    assert "corrupt checkpoint at step 6" in logs[0] and "previous good checkpoint, step 4" in logs[1]
    (tmp_path / "state-000000004.pt").write_bytes(b"truncated")
    logs.clear()
    assert load_state(tmp_path, run, fp, log=logs.append) is None and "restarting from scratch" in logs[-1]


def test_corrupt_checkpoint_restarts_from_scratch(params, corpus_dir, mlflow_uri, tmp_path, capsys):
    job = tiny_job(params, mlflow_uri, steps=3)
    save_state(tmp_path, {"run_id": job.run_id, "fingerprint": fingerprint(job), "step": 2})
    (tmp_path / "state-000000002.pt").write_bytes(b"not a checkpoint")
    meta = pretrain(job, corpus_dir, tmp_path)
    out = capsys.readouterr().out
    assert "corrupt checkpoint" in out and "restarting from scratch" in out and meta["train_steps"] == 3


def test_checkpoints_load_tensors_only(tmp_path):
    """A state holding a pickled Python object is not executed on load: it counts as corrupt."""
    run, fp = "mae/femto/all/n60/s0", "abc"
    save_state(tmp_path, {"run_id": run, "fingerprint": fp, "step": 1, "obj": Path("x")})  # any non-tensor class
    logs = []
    assert load_state(tmp_path, run, fp, log=logs.append) is None
    assert "weights_only" in logs[0] or "Unsupported" in logs[0] or "not allowed" in logs[0].lower()


@pytest.mark.parametrize("method", ["mae", "dino"])
def test_gradient_accumulation_matches_one_big_batch(params, corpus_dir, mlflow_uri, tmp_path, method):
    job = tiny_job(params, mlflow_uri, method, steps=3, checkpoint_every=100, threads=1)
    # KoLeo's nearest neighbours are searched within a forward pass (per process in DINOv2 too): not split-invariant
    job = replace(job, method_cfg={**job.method_cfg, "koleo_weight": 0.0}) if method == "dino" else job
    one = pretrain(job, corpus_dir, tmp_path / "one")
    two = pretrain(replace(job, train=replace(job.train, grad_accum=4)), corpus_dir, tmp_path / "two")
    h1 = pd.read_csv(tmp_path / "one" / "history.csv")
    h2 = pd.read_csv(tmp_path / "two" / "history.csv")
    np.testing.assert_allclose(h1["loss"], h2["loss"], rtol=1e-5)
    np.testing.assert_allclose(h1["grad_norm"], h2["grad_norm"], rtol=1e-4)
    w1, w2 = load_file(tmp_path / "one" / "checkpoint.safetensors"), load_file(tmp_path / "two" / "checkpoint.safetensors")
    assert all(np.allclose(w1[k], w2[k], atol=1e-5) for k in w1)
    assert one["images_seen"] == two["images_seen"] == 3 * 32


def test_dino_run_does_not_collapse_and_learns(params, synthetic_corpus, mlflow_uri, tmp_path):
    """Teacher entropy stays away from 0 (one prototype wins) and from log K (uniform targets), the batch spreads
    over prototypes, and the student-teacher KL falls.

    DINO's loss is H(teacher) + KL(teacher || student); at initialisation every image maps to nearly the same
    prototype (entropy near 0), so the raw loss rises while the targets spread out: the KL is what must fall."""
    job = pretrain_job(params, "dino", "atto", "all", 240, 0)
    job = replace(job, tracking={"uri": mlflow_uri, "experiment": "test"},
                  train=replace(job.train, steps=80, batch_size=32, checkpoint_every=1000, log_every=20))
    pretrain(job, synthetic_corpus, tmp_path)
    h = pd.read_csv(tmp_path / "history.csv")
    log_k = np.log(job.method_cfg["prototypes"])
    late = h.iloc[len(h) // 2:]
    assert late["teacher_entropy"].between(0.2 * log_k, 0.95 * log_k).all(), late["teacher_entropy"].describe()
    assert late["teacher_batch_entropy"].mean() > 0.5 * log_k
    assert h["kl"].iloc[-10:].mean() < 0.7 * h["kl"].iloc[:5].mean()
    assert {"ibot_loss", "koleo", "grad_norm", "weight_decay"} <= set(h.columns)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["mae"])  # DINO: tests/test_kills.py kills and resumes its job under Snakemake
def test_killed_job_resumes_to_the_same_weights(params, corpus_dir, mlflow_uri, tmp_path, method):
    """SIGKILL a real `biovfm pretrain` process after its first checkpoint, rerun it, compare with an uninterrupted run."""
    job = tiny_job(params, mlflow_uri, method, steps=400 if method == "mae" else 150, checkpoint_every=20, log_every=50,
                   threads=1, batch_size=16)
    cmd = [sys.executable, "-m", "biovfm.cli", "pretrain", "--job", to_json(job), "--corpus", str(corpus_dir)]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(cmd + ["--out", str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not list(killed.glob("state-*.json")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "run.json").exists(), "the job finished before it could be killed; raise steps"
    assert not (killed / "checkpoint.safetensors").exists()
    subprocess.run(cmd + ["--out", str(killed)], check=True, capture_output=True)
    straight = tmp_path / "straight"
    subprocess.run(cmd + ["--out", str(straight)], check=True, capture_output=True)
    wk, ws = load_file(killed / "checkpoint.safetensors"), load_file(straight / "checkpoint.safetensors")
    assert all(np.array_equal(wk[k], ws[k]) for k in ws)
    hk = (killed / "history.csv").read_text()
    assert hk == (straight / "history.csv").read_text()
    assert json.loads((killed / "run.json").read_text())["mlflow_run_id"]


def test_layer_decay_scales_lr_by_depth_and_spares_1d_params_from_decay():
    from biovfm.config import ModelSpec
    from biovfm.methods.dino import DINO
    from biovfm.models.vit import build_encoder
    from biovfm.train.optim import param_groups

    torch.manual_seed(0)
    dino = DINO(build_encoder(ModelSpec("t", 32, 3, 2, 4), 16), 16, 3, prototypes=8, head_hidden_dim=8, head_bottleneck_dim=4)
    groups = param_groups(dino, 0.04, layer_decay=0.5)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    enc = dino.encoder
    assert scale[id(enc.patch_embed.proj.weight)] == 0.5**4  # embeddings: layer 0 of 3 blocks
    assert scale[id(enc.blocks[0].attn.qkv.weight)] == 0.5**3 and scale[id(enc.blocks[2].mlp.fc2.weight)] == 0.5
    assert scale[id(dino.head.last)] == 1.0 and scale[id(enc.norm.weight)] == 1.0
    assert all(id(p) not in scale for p in dino.teacher_encoder.parameters())  # the teacher is not optimised
    no_decay = {id(p) for g in groups if not g["decay"] for p in g["params"]}
    assert id(enc.blocks[0].attn.qkv.bias) in no_decay and id(enc.cls_token) in no_decay
    assert all(g["weight_decay"] == (0.04 if g["decay"] else 0.0) for g in groups)
    assert len({id(p) for g in groups for p in g["params"]}) == sum(p.requires_grad for p in dino.parameters())


def test_weight_decay_follows_its_cosine_schedule(params, mlflow_uri, corpus_dir, tmp_path):
    job = tiny_job(params, mlflow_uri, steps=5, weight_decay=0.04, weight_decay_end=0.4)
    pretrain(job, corpus_dir, tmp_path)
    wd = pd.read_csv(tmp_path / "history.csv")["weight_decay"].to_numpy()
    assert wd[0] == pytest.approx(0.04) and wd[-1] == pytest.approx(0.4) and (np.diff(wd) > 0).all()


@pytest.mark.slow
def test_bf16_and_compile_options_train(params, corpus_dir, mlflow_uri, tmp_path):
    """The options run end to end on CPU (speed is measured in benchmarks/, not here)."""
    meta = pretrain(tiny_job(params, mlflow_uri, "dino", steps=2, precision="bf16", compile=True), corpus_dir, tmp_path)
    assert np.isfinite(meta["final_loss"])


def test_pretraining_reads_batches_not_the_data_set(params, mlflow_uri, tmp_path):
    """Memory is bounded by the batch: a run on a 20 MB store allocates a few batches of images, never the subset
    (numpy's allocations are traced; the whole subset would be 20 MB)."""
    import tracemalloc

    n = 6400
    images = np.random.default_rng(0).integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    write_store(tmp_path / "big", images, np.full(n, "test"), np.full(n, "xray"), shard_size=512)
    del images
    job = pretrain_job(params, "mae", "femto", "all", n, 0)
    job = replace(job, image_size=32, modality_sources=("xray",), tracking={"uri": mlflow_uri, "experiment": "test"},
                  train=replace(job.train, steps=3, batch_size=16, checkpoint_every=100, log_every=100))
    pretrain(replace(job, train=replace(job.train, steps=1)), tmp_path / "big", tmp_path / "warm")  # imports, caches
    tracemalloc.start()
    try:
        pretrain(job, tmp_path / "big", tmp_path / "run")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 6e6, f"traced peak {peak / 1e6:.1f} MB for a {n * 32 * 32 * 3 / 1e6:.0f} MB subset"


def test_batch_stream_gives_each_process_its_micro_batches_of_the_step(corpus_dir):
    """What the background loader yields is the pure function of (seed, step, rank, accumulation) the engine
    reads: rank r's micro-batch k is its slice of the step's global batch, in order."""
    from biovfm.train.loader import BatchStream, read_batch

    store = load_store(corpus_dir)
    rows = store.subset(["xray", "ct"], 60, seed=0)
    stream = BatchStream(store.images, rows, 16, 3, rank=1, accum=2, mb=4, start=5, stop=9)
    got = list(stream)
    stream.close()
    assert [s for s, _ in got] == [5, 6, 7, 8]
    for step, batches in got:
        idx = batch_indices(len(rows), 16, step, seed=3).numpy()
        for k, x in enumerate(batches):
            want = store.images[rows[idx[(1 * 2 + k) * 4:(1 * 2 + k + 1) * 4]]]
            assert x.dtype == torch.uint8 and x.shape == (4, 3, 16, 16)
            assert torch.equal(x, torch.from_numpy(want).permute(0, 3, 1, 2)) and x.is_contiguous()
    assert torch.equal(read_batch(store.images, rows[:3]), torch.from_numpy(store.images[rows[:3]]).permute(0, 3, 1, 2))


def test_a_failing_read_stops_training_with_its_error(corpus_dir):
    from biovfm.train.loader import BatchStream

    store = load_store(corpus_dir)
    stream = BatchStream(store.images, np.array([0, 1, 10**6]), 3, 0, rank=0, accum=1, mb=3, start=0, stop=4)
    with pytest.raises(IndexError, match="out of range for a store of 96 images"):
        list(stream)
    stream.close()


def test_param_groups_ask_for_fused_adamw_and_states_load_both_ways():
    """The engine's AdamW(param_groups(...)) runs torch's fused kernel; an update matches the per-tensor loop's
    and optimizer states (checkpoints) load into either."""
    from biovfm.config import ModelSpec
    from biovfm.methods.mae import MAE
    from biovfm.methods.base import StepContext
    from biovfm.models.vit import build_encoder
    from biovfm.train.optim import param_groups

    def model() -> MAE:
        torch.manual_seed(0)
        return MAE(build_encoder(ModelSpec("t", 32, 2, 2, 4), 16), 16, 3, decoder_dim=16, decoder_depth=1, decoder_heads=2)

    batch = (torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    out = {}
    for fused in (True, False):
        m = model()
        groups = param_groups(m, 0.05)
        assert all(g["fused"] for g in groups)
        if not fused:
            groups = [{**g, "fused": None} for g in groups]
        opt = torch.optim.AdamW(groups, lr=1e-3)
        for step in range(2):
            loss, _ = m(batch, StepContext.single(step, 4))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        out[fused] = (m, opt)
    (mf, of), (ml, ol) = out[True], out[False]
    # same update rule; rounding differs, which Adam amplifies only where a gradient is itself rounding noise
    # (a key bias: softmax ignores it) to at most lr x 1e-2
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(mf.parameters(), ml.parameters()))
    fresh = torch.optim.AdamW(param_groups(model(), 0.05), lr=1e-3)
    fresh.load_state_dict(ol.state_dict())  # a state saved by the per-tensor loop
    fresh.load_state_dict(of.state_dict())
    assert all(g["fused"] for g in fresh.param_groups)


def test_the_same_encoder_is_saved_as_the_same_bytes(tmp_path):
    """safetensors writes its metadata in hash-map order, different at every call; save_encoder sorts it, so the
    same weights give the same file (and the same DVC hash), and the file still reads back whole."""
    from safetensors import safe_open
    from safetensors.torch import save

    from biovfm.train.checkpoint import save_encoder

    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    meta = {f"key{i}": f"value {i}" for i in range(12)} | {"run_id": "mae/femto/all/n60/s0", "note": "é/\n\"x\""}
    assert len({save({"w": torch.zeros(2)}, metadata=meta) for _ in range(5)}) > 1  # what is fixed here
    files = [tmp_path / f"{i}.safetensors" for i in range(5)]
    for f in files:
        save_encoder(f, encoder, meta)
    assert len({f.read_bytes() for f in files}) == 1
    with safe_open(str(files[0]), "pt") as f:
        assert f.metadata() == meta
        assert all(torch.equal(f.get_tensor(k), v) for k, v in encoder.state_dict().items())
