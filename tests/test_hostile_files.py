"""Hostile files run nothing; patient-identifying DICOM attributes go nowhere.

* A real malicious pickle (its ``__reduce__`` would create a marker file) saved as
  ``.pth``, ``.pt`` and ``.ckpt`` is fed to every entry point that takes weights or a
  checkpoint: each refuses it with a clear error and the marker never appears.
* PHI set in DICOM headers (names, ids, birth date, address, institution, accession)
  never reaches stdout/stderr, run directories, checkpoints or exported files of
  info / pretrain / reconstruct / export / finetune / predict.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from _bad_corpus import load_corpus
from _mim_tiny import TINY_MODEL, tiny, tiny_cli_flags

from mim_workbench.cli import main
from mim_workbench.errors import CheckpointError, MimError
from mim_workbench.models import ModelConfig, build_model, load_encoder_weights
from mim_workbench.models import checkpoint as ck
from mim_workbench.training.config import PretrainConfig
from mim_workbench.training.encoder_source import load_encoder
from mim_workbench.training.pretrain_loop import pretrain

SUFFIXES = (".pth", ".pt", ".ckpt")


class _Payload:
    """Unpickling this runs ``touch <marker>``: what a trojan checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


@pytest.fixture
def trojans(tmp_path) -> tuple[dict[str, Path], Path]:
    marker = tmp_path / "PWNED"
    model = build_model(ModelConfig.from_dict(TINY_MODEL))
    state = {**model.encoder.state_dict(), "evil": _Payload(marker)}
    files = {}
    for suffix in SUFFIXES:
        files[suffix] = tmp_path / f"trojan{suffix}"
        torch.save({"model": state}, files[suffix])
    # The payload is live: an unrestricted load would run it.
    torch.load(files[".pth"], weights_only=False)
    assert marker.exists()
    marker.unlink()
    return files, marker


def _refused(call, marker: Path) -> str:
    with pytest.raises(MimError) as info:
        call()
    assert not marker.exists(), "the pickle's code ran"
    message = str(info.value)
    assert "\n" not in message
    return message


def test_malicious_pickles_are_refused_by_every_entry_point(trojans, tmp_path, capsys):
    files, marker = trojans
    enc = build_model(ModelConfig.from_dict(TINY_MODEL)).encoder
    run = tmp_path / "run"
    pretrain(PretrainConfig.from_dict(tiny(run, max_steps=1)))       # a genuine run, to point commands at
    for suffix, path in files.items():
        msg = _refused(lambda: load_encoder_weights(enc, path), marker)
        assert str(path) in msg and ("weights_only" in msg or "unsupported weights format" in msg)
        _refused(lambda: ck.load_checkpoint(path).model_state(), marker)
        _refused(lambda: pretrain(PretrainConfig(resume=str(path))), marker)
        _refused(lambda: pretrain(PretrainConfig.from_dict(tiny(tmp_path / f"init{suffix}", init=str(path)))), marker)
        _refused(lambda: load_encoder(path), marker)
        _refused(lambda: load_encoder(path, model_config=TINY_MODEL), marker)
        image = Path(__file__).resolve().parents[1] / "sample_data" / "images"
        image = sorted(image.iterdir())[0]
        for argv in (["reconstruct", "--checkpoint", str(path), "--image", str(image), "--out", str(tmp_path / "r")],
                     ["export", "--checkpoint", str(path), "--out", str(tmp_path / "e.safetensors")],
                     ["finetune", "--checkpoint", str(path), "--data", str(image.parent), "--out", str(tmp_path / "f")],
                     ["predict", "--checkpoint", str(path), "--image", str(image), "--out", str(tmp_path / "p")],
                     ["pretrain", "--resume", str(path)],
                     ["pretrain", "--data", str(image.parent), "--out", str(tmp_path / f"cli{suffix}"),
                      "--init", str(path), *tiny_cli_flags(), "--max-steps", "1"]):
            assert main(argv) == 2, argv
            assert not marker.exists(), argv
        err = capsys.readouterr().err
        assert err.count("\n") == 6 and "Traceback" not in err

    # A checkpoint directory whose safetensors files were swapped for the pickle.
    ckpt_dir = ck.load_checkpoint(run).path
    for name in (ck.MODEL_FILE, ck.OPTIM_FILE):
        shutil.copy(files[".pth"], ckpt_dir / name)
    _refused(lambda: pretrain(PretrainConfig(resume=str(run))), marker)
    _refused(lambda: load_encoder(run), marker)
    assert main(["reconstruct", "--checkpoint", str(run), "--image", str(image), "--out", str(tmp_path / "r")]) == 2
    assert not marker.exists()


def test_checkpoint_metadata_is_schema_checked(tmp_path):
    import json

    run = tmp_path / "run"
    pretrain(PretrainConfig.from_dict(tiny(run, max_steps=1)))
    meta_path = ck.load_checkpoint(run).path / ck.META_FILE
    good = json.loads(meta_path.read_text())
    for key, value in (("step", "1"), ("epoch", [0]), ("config", "x"), ("model_config", 3), ("sampler", 1),
                       ("rng", []), ("metrics", "fast"), ("dataset_signature", 5), ("world_size", "1")):
        meta_path.write_text(json.dumps({**good, key: value}))
        with pytest.raises(CheckpointError, match=key) as info:
            c = ck.load_checkpoint(run)
            pretrain(PretrainConfig(resume=str(c.path)))
        assert str(meta_path) in str(info.value) or key == "step"


# ====================================================================== privacy
PHI = {
    "PatientName": "Doe^Janephi", "PatientID": "PHIID-73519", "PatientBirthDate": "19710203",
    "OtherPatientIDs": "ALTPHI-4411", "PatientAddress": "221B Phibaker Street",
    "InstitutionName": "St Phiplace Hospital", "ReferringPhysicianName": "Phiref^Gregory",
    "AccessionNumber": "ACCPHI987", "PatientTelephoneNumbers": "555-0199-PHI",
}


def _phi_strings() -> list[bytes]:
    out = set()
    for value in PHI.values():
        out.add(value.encode())
        out.update(part.encode() for part in value.replace("^", " ").split() if len(part) >= 6)
    return sorted(out)


def test_phi_never_reaches_outputs_or_logs(tmp_path, capfd):
    import numpy as np

    corpus = load_corpus()
    data = tmp_path / "dicoms"
    data.mkdir()
    rng = np.random.default_rng(0)
    lines = ["id,label"]
    for i in range(8):
        phi = {**PHI, "PatientID": f"{PHI['PatientID']}{i % 4}"}
        pixels = (rng.random((72, 64)) * 3000 + np.linspace(0, 1000, 64)).astype(np.uint16)
        (data / f"scan{i}.dcm").write_bytes(corpus.dicom_bytes(pixels, phi=phi))
        lines.append(f"scan{i},{'a' if i % 2 else 'b'}")
    (data / "labels.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    tiny_flags = tiny_cli_flags()
    commands = [
        ["info", str(data)],
        ["pretrain", "--data", str(data), "--out", str(out / "run"), *tiny_flags, "--epochs", "2", "--max-steps", "2",
         "--preview-every", "1"],
        ["reconstruct", "--checkpoint", str(out / "run"), "--image", str(data / "scan0.dcm"), "--out", str(out / "rec")],
        ["export", "--checkpoint", str(out / "run"), "--out", str(out / "encoder.safetensors")],
        ["finetune", "--checkpoint", str(out / "run"), "--data", str(data), "--out", str(out / "ft"), "--epochs", "1",
         "--batch-size", "2", "--threads", "1"],
        ["predict", "--checkpoint", str(out / "ft"), "--image", str(data / "scan1.dcm"), "--out", str(out / "pred")],
    ]
    for argv in commands:
        assert main(argv) == 0, argv
    captured = capfd.readouterr()
    produced = [p for p in out.rglob("*") if p.is_file()]
    assert len(produced) >= 10 and (out / "encoder.safetensors").is_file()
    texts = {"stdout": captured.out.encode(), "stderr": captured.err.encode()}
    texts.update({str(p): p.read_bytes() for p in produced})
    assert b"scan0" in texts["stdout"]   # the outputs do talk about the files...
    for where, blob in texts.items():
        for secret in _phi_strings():    # ...but never about the patient
            assert secret.lower() not in blob.lower(), f"{secret!r} leaked into {where}"
