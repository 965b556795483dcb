"""The MedMNIST+ download stage against a local mirror (127.0.0.1 only): resume, retries, MD5, atomic placement."""
from __future__ import annotations

import hashlib
import io
import os

import numpy as np
import pytest
import yaml

from biovfm import cli
from biovfm.config import ParamsError, load_params, validate_params
from biovfm.data import download as dl
from biovfm.data.download import DownloadError, download_file, download_medmnist, expected_md5, medmnist_url
from biovfm.data.medmnist import MD5, SIZES, TASKS, ZENODO_FILES, load_npz, npz_name, task_info
from biovfm.data.synthetic import generate_task
from conftest import REPO
from http_mirror import Mirror


def _npz_bytes(flag: str = "breastmnist", size: int = 28) -> bytes:
    """A MedMNIST-layout npz (uncompressed, as MedMNIST ships), large enough to be cut in two."""
    buf = io.BytesIO()
    np.savez(buf, **generate_task(flag, 40, 20, 20, size=size, seed=0))
    return buf.getvalue()


def _md5(b: bytes) -> str:
    return hashlib.md5(b).hexdigest()


def _quiet(msg: str) -> None:
    _quiet.lines.append(msg)


_quiet.lines = []


@pytest.fixture
def body() -> bytes:
    return _npz_bytes()


def _get(mirror: Mirror, name: str, dest, md5: str, **kw) -> dict:
    kw = {"retries": 2, "timeout": 10, "backoff": 0.0, "log": _quiet} | kw
    return download_file(f"{mirror.url}/{name}", dest, md5, **kw)


# --------------------------------------------------------------------------------------------- metadata
def test_published_names_md5s_and_urls_follow_medmnist_plus():
    assert set(MD5) == set(TASKS) and all(set(v) == set(SIZES) for v in MD5.values())
    assert all(len(h) == 32 for v in MD5.values() for h in v.values())
    assert npz_name("pathmnist", 28) == "pathmnist.npz" and npz_name("pathmnist", 224) == "pathmnist_224.npz"
    assert expected_md5("pathmnist", 64) == "55aa9c1e0525abe5a6b9d8343a507616"
    assert expected_md5("pathmnist", 64, {"pathmnist_64.npz": "0" * 32}) == "0" * 32
    assert expected_md5("pathmnist", 28, {"pathmnist_64.npz": "0" * 32}) == "a8b06965200029087d5bd730944a56c1"
    assert medmnist_url(ZENODO_FILES, "pathmnist.npz") == "https://zenodo.org/records/10519652/files/pathmnist.npz?download=1"
    assert medmnist_url("http://127.0.0.1:8000/m/", "x_64.npz") == "http://127.0.0.1:8000/m/x_64.npz"
    with pytest.raises(ValueError, match="MedMNIST\\+ has no 32px files"):
        npz_name("pathmnist", 32)
    with pytest.raises(KeyError, match="unknown task 'foomnist'"):
        npz_name("foomnist", 28)


# --------------------------------------------------------------------------------------------- outcomes
def test_good_file_is_verified_placed_atomically_and_never_fetched_twice(tmp_path, body):
    dest = tmp_path / "breastmnist.npz"
    with Mirror({"breastmnist.npz": (body, "ok")}) as m:
        rec = _get(m, "breastmnist.npz", dest, _md5(body))
        assert rec["downloaded"] and dest.read_bytes() == body
        assert not dl.part_path(dest).exists() and dl.sidecar_path(dest).exists()
        load_npz(dest, task_info("breastmnist"))
        assert _get(m, "breastmnist.npz", dest, _md5(body))["downloaded"] is False  # sidecar: no request, no hash
        os.utime(dest, ns=(0, 0))  # sidecar stale: one re-hash, still no request
        assert _get(m, "breastmnist.npz", dest, _md5(body))["downloaded"] is False
        assert len(m.requests) == 1


def test_corrupt_file_in_place_is_fetched_again(tmp_path, body):
    dest = tmp_path / "breastmnist.npz"
    dest.write_bytes(body[: len(body) // 3])  # e.g. an interrupted manual copy
    with Mirror({"breastmnist.npz": (body, "ok")}) as m:
        assert _get(m, "breastmnist.npz", dest, _md5(body))["downloaded"]
    assert dest.read_bytes() == body


def test_dropped_connection_resumes_with_range_and_verifies(tmp_path, body):
    dest = tmp_path / "breastmnist.npz"
    with Mirror({"breastmnist.npz": (body, "drop_once")}) as m:
        _get(m, "breastmnist.npz", dest, _md5(body))
    half = len(body) // 2
    assert m.requests == [("breastmnist.npz", None), ("breastmnist.npz", f"bytes={half}-")]
    assert dest.read_bytes() == body and not dl.part_path(dest).exists()


def test_partial_file_from_an_earlier_run_is_resumed(tmp_path, body):
    dest = tmp_path / "breastmnist.npz"
    dl.part_path(dest).write_bytes(body[:1000])
    with Mirror({"breastmnist.npz": (body, "ok")}) as m:
        _get(m, "breastmnist.npz", dest, _md5(body))
    assert m.requests == [("breastmnist.npz", "bytes=1000-")] and dest.read_bytes() == body


def test_server_ignoring_range_restarts_from_zero(tmp_path, body):
    dest = tmp_path / "breastmnist.npz"
    _quiet.lines.clear()
    with Mirror({"breastmnist.npz": (body, "drop_once_no_range")}) as m:
        _get(m, "breastmnist.npz", dest, _md5(body))
    assert len(m.requests) == 2 and m.requests[1][1] == f"bytes={len(body) // 2}-"
    assert any("ignored the Range request; restarting from byte 0" in x for x in _quiet.lines)
    assert dest.read_bytes() == body


def test_truncated_transfer_fails_after_retries_and_keeps_the_part_for_next_time(tmp_path, body):
    dest = tmp_path / "breastmnist.npz"
    with Mirror({"breastmnist.npz": (body, "truncated")}) as m:
        with pytest.raises(DownloadError) as e:
            _get(m, "breastmnist.npz", dest, _md5(body), retries=2)
    msg = str(e.value)
    assert f"{m.url}/breastmnist.npz" in msg and "after 3 attempt(s)" in msg
    assert f"connection closed after {len(body) // 2:,} of {len(body):,} bytes" in msg
    assert "resumes from it" in msg and dl.part_path(dest).stat().st_size == len(body) // 2
    assert not dest.exists() and len(m.requests) == 3


def test_md5_mismatch_deletes_the_part_retries_then_names_url_and_both_hashes(tmp_path, body):
    dest = tmp_path / "breastmnist.npz"
    wrong = "0123456789abcdef0123456789abcdef"
    with Mirror({"breastmnist.npz": (body, "ok")}) as m:
        with pytest.raises(DownloadError) as e:
            _get(m, "breastmnist.npz", dest, wrong, retries=1)
    msg = str(e.value)
    assert f"{m.url}/breastmnist.npz" in msg and f"expected {wrong}, got {_md5(body)}" in msg
    assert "data.medmnist.md5" in msg and len(m.requests) == 2
    assert m.requests[1][1] is None  # the bad part was deleted, so the retry starts from zero
    assert not dest.exists() and not dl.part_path(dest).exists()


def test_404_fails_at_once_naming_the_url(tmp_path):
    with Mirror({}) as m:
        with pytest.raises(DownloadError) as e:
            _get(m, "pathmnist_64.npz", tmp_path / "pathmnist_64.npz", "0" * 32)
    assert f"{m.url}/pathmnist_64.npz: HTTP 404" in str(e.value) and "data.medmnist.base_url" in str(e.value)
    assert len(m.requests) == 1 and not list(tmp_path.iterdir())


def test_transient_errors_retry_with_exponential_backoff(tmp_path, body, monkeypatch):
    waits = []
    monkeypatch.setattr(dl.time, "sleep", waits.append)
    with Mirror({"breastmnist.npz": (body, "busy_once")}) as m:
        _get(m, "breastmnist.npz", tmp_path / "b.npz", _md5(body), backoff=1.5)
    assert waits == [1.5] and len(m.requests) == 2
    waits.clear()
    with pytest.raises(DownloadError, match="after 4 attempt\\(s\\) \\(cannot reach the server"):
        _get(m, "breastmnist.npz", tmp_path / "c.npz", _md5(body), retries=3, backoff=1.5)  # the mirror is gone now
    assert waits == [1.5, 3.0, 6.0]


def test_file_url_mirror(tmp_path, body):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "breastmnist.npz").write_bytes(body)
    out = tmp_path / "raw"
    recs = download_medmnist(out, ["breastmnist"], 28, mirror.as_uri(), {"breastmnist.npz": _md5(body)}, retries=0)
    assert recs[0]["downloaded"] and (out / "breastmnist.npz").read_bytes() == body


def test_any_subset_at_any_size_with_md5_overrides(tmp_path):
    files = {npz_name(f, 64): _npz_bytes(f, size=64) for f in ("pathmnist", "chestmnist")}
    overrides = {k: _md5(v) for k, v in files.items()}
    with Mirror({k: (v, "ok") for k, v in files.items()}) as m:
        recs = download_medmnist(tmp_path, ["pathmnist", "chestmnist"], 64, m.url + "/", overrides, retries=0)
    assert [r["file"] for r in recs] == [str(tmp_path / "pathmnist_64.npz"), str(tmp_path / "chestmnist_64.npz")]
    assert load_npz(tmp_path / "chestmnist_64.npz", task_info("chestmnist"))["train_images"].shape[1:] == (64, 64)


def test_cli_reports_success_and_errors(tmp_path, body, capsys):
    with Mirror({"breastmnist.npz": (body, "ok")}) as m:
        args = ["download-medmnist", "--flags", "breastmnist", "--size", "28", "--base-url", m.url, "--retries", "0",
                "--backoff", "0", "--out", str(tmp_path)]
        assert cli.main(args + ["--md5", f"breastmnist.npz={_md5(body)}"]) == 0
        assert "1 MedMNIST+ file(s) at 28px verified" in capsys.readouterr().out
        assert cli.main(args[:2] + ["pathmnist"] + args[3:]) == 1
    assert f"{m.url}/pathmnist.npz: HTTP 404" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- params
def _medmnist_params(raw_params: dict, **medmnist) -> dict:
    raw_params["data"]["source"] = "medmnist"
    raw_params["data"]["medmnist"] = medmnist
    return raw_params


def test_download_size_follows_the_study_size_or_asks_for_one(raw_params):
    with pytest.raises(ParamsError) as e:  # the tiny study runs at 16 px: not a MedMNIST+ size
        validate_params(_medmnist_params(raw_params), source="my.yaml")
    assert "my.yaml: data.medmnist.size: data.image_size=16 is not a MedMNIST+ size" in str(e.value)
    p = validate_params(_medmnist_params(raw_params, size=28))
    assert p["data"]["medmnist"] == {"base_url": ZENODO_FILES, "size": 28, "retries": 5, "backoff": 2.0,
                                     "timeout": 60, "md5": {}}
    raw_params["data"]["image_size"] = 64
    for m in raw_params["models"].values():
        m["patch_size"] = 8
    assert validate_params(_medmnist_params(raw_params))["data"]["medmnist"]["size"] == 64


@pytest.mark.parametrize(
    "medmnist, needle",
    [
        ({"size": 32}, "data.medmnist.size: 32 is not one of [28, 64, 128, 224, None]"),
        ({"size": 28, "md5": {"pathmnist_32.npz": "0" * 32}}, "data.medmnist.md5: 'pathmnist_32.npz' does not match"),
        ({"size": 28, "md5": {"pathmnist.npz": "xyz"}}, "data.medmnist.md5.pathmnist.npz: 'xyz' does not match"),
        ({"size": 28, "base_url": "zenodo.org/records"}, "data.medmnist.base_url: 'zenodo.org/records' does not match"),
    ],
)
def test_bad_medmnist_params_name_the_key(raw_params, medmnist, needle):
    with pytest.raises(ParamsError) as e:
        validate_params(_medmnist_params(raw_params, **medmnist), source="my.yaml")
    assert needle in str(e.value)


def test_synthetic_default_is_unchanged_by_the_medmnist_section():
    p = load_params(REPO / "params.yaml")
    assert p["data"]["source"] == "synthetic" and p["data"]["custom_tasks"] == []


def test_ready_medmnist_config_validates():
    p = load_params(REPO / "configs" / "medmnist.yaml")
    assert p["data"]["source"] == "medmnist" and p["data"]["medmnist"]["size"] == p["data"]["image_size"] == 64
    assert p["data"]["tasks"] == list(TASKS)
    assert yaml.safe_load((REPO / "configs" / "medmnist.yaml").read_text()).keys() >= {
        "data", "grid", "models", "modalities", "pretrain", "methods", "evaluate", "tracking"}
