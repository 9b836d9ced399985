"""Dense head on dental_dc1000: pretrained vs random-init encoder, features-only vs refined, image-only.

5 training images with simulated strokes (< 2 % of pixels), caries-pixel AUC / AP on 10 other images,
3 seeds (strokes + head).  The pretrained encoder: MAE on 128 px tiles of the other 85 images at scale 0.5
(the dense head's working scale), budget BUDGET_MIN minutes of CPU training.
"""
import json, math, sys, time
from pathlib import Path
import numpy as np, torch
from PIL import Image
from sklearn.metrics import average_precision_score, roc_auc_score

from mim_workbench.models import ModelConfig
from mim_workbench.training.config import PretrainConfig
from mim_workbench.models.dense import DenseConfig
from mim_workbench.training.dense import train_dense
from mim_workbench.training.pretrain_loop import pretrain
from mim_workbench.training.strokes import simulate_strokes

BUDGET_MIN = float(sys.argv[1]) if len(sys.argv) > 1 else 8.0
OUT = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/dense"); OUT.mkdir(parents=True, exist_ok=True)
D = Path("/work/shared/data/dental_dc1000")
ids = sorted(p.stem for p in (D / "images").glob("*.png"))
train_ids, test_ids, pre_ids = ids[:5], ids[5:15], ids[15:]
ARCH = dict(img_size=(128, 128), patch_size=16, embed_dim=128, depth=4, num_heads=4)
torch.set_num_threads(2)

def load(i):
    return (np.asarray(Image.open(D / "images" / f"{i}.png").convert("L"), dtype=np.float32) / 255.0,
            np.asarray(Image.open(D / "caries_masks" / f"{i}.png")) > 0)

# 1. tiles for pretraining (scale 0.5, 128 px, stride 128)
tiles = OUT / "tiles" / "images"
if not tiles.exists():
    tiles.mkdir(parents=True)
    for i in pre_ids:
        im = Image.open(D / "images" / f"{i}.png").convert("L")
        im = im.resize((round(im.width * 0.5), round(im.height * 0.5)), Image.BICUBIC)
        a = np.asarray(im)
        for r in range(0, a.shape[0] - 127, 128):
            for c in range(0, a.shape[1] - 127, 128):
                Image.fromarray(a[r:r + 128, c:c + 128]).save(tiles / f"{i}_{r}_{c}.png")
n_tiles = len(list(tiles.glob("*.png")))
# 2. pretrain MAE (random masking) within the budget
pre_dir = OUT / "pretrain"
ckpt_file = OUT / "pretrain.json"
if ckpt_file.exists():
    pre = json.loads(ckpt_file.read_text())
else:
    cal = pretrain(PretrainConfig.from_dict(dict(data=str(tiles), out=str(OUT / "cal"), **{k: v for k, v in ARCH.items()},
                                  decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4, batch_size=32,
                                  epochs=1000, max_steps=3, val_fraction=0.0, val_every=0, preview_every=0, threads=2)))
    el = [r["elapsed_s"] for r in cal.history]
    step_s = (el[-1] - el[0]) / 2
    spe = math.ceil(n_tiles / 32)
    epochs = max(1, int(BUDGET_MIN * 60 / step_s / spe))
    t0 = time.time()
    res = pretrain(PretrainConfig.from_dict(dict(data=str(tiles), out=str(pre_dir), **ARCH, decoder_embed_dim=64, decoder_depth=2,
                                  decoder_num_heads=4, batch_size=32, epochs=epochs, time_budget_s=BUDGET_MIN * 60,
                                  val_fraction=0.0, val_every=0, preview_every=0, threads=2, keep_checkpoints=1)))
    pre = {"checkpoint": res.last_checkpoint, "steps": res.step, "epochs_planned": epochs, "reason": res.reason,
           "loss_first": res.history[0]["loss"], "loss_last": res.final_loss, "wall_s": time.time() - t0,
           "train_s": res.history[-1]["elapsed_s"], "tiles": n_tiles}
    ckpt_file.write_text(json.dumps(pre, indent=1))
print("pretraining:", pre, flush=True)

# 3. dense heads
train = [load(i) for i in train_ids]
test = [load(i) for i in test_ids]
y = np.concatenate([m.ravel() for _, m in test])
print(f"caries prevalence in test pixels: {y.mean():.5f}; intensity AUC {roc_auc_score(y, np.concatenate([im.ravel() for im, _ in test])):.3f}")
configs = {
    "random enc, patch-linear": dict(checkpoint=None, refine=False),
    "random enc, + refine": dict(checkpoint=None, refine=True),
    "MAE enc, patch-linear": dict(checkpoint=pre["checkpoint"], refine=False),
    "MAE enc, + refine": dict(checkpoint=pre["checkpoint"], refine=True),
    "image only (no encoder)": dict(checkpoint=None, use_features=False),
}
rows = []
for name, c in configs.items():
    aucs, aps, secs = [], [], []
    for seed in range(3):
        strokes = [simulate_strokes({"caries": m}, fraction=0.02, width=3, seed=100 * seed + k) for k, (_, m) in enumerate(train)]
        c2 = dict(c); ck = c2.pop("checkpoint")
        t0 = time.time()
        head = train_dense([im for im, _ in train], strokes, checkpoint=ck, model_config=ModelConfig.from_dict(ARCH),
                           config=DenseConfig(classes=["caries", "other"], scale=0.5, steps=300, seed=seed, threads=2, **c2))
        secs.append(time.time() - t0)
        p = np.concatenate([head.predict(im).prob("caries").ravel() for im, _ in test])
        aucs.append(roc_auc_score(y, p)); aps.append(average_precision_score(y, p))
    rows.append((name, np.mean(aucs), np.std(aucs, ddof=1), np.mean(aps), np.std(aps, ddof=1), np.mean(secs)))
    print(f"| {name} | {rows[-1][1]:.3f} ± {rows[-1][2]:.3f} | {rows[-1][3]:.4f} ± {rows[-1][4]:.4f} | {rows[-1][5]:.0f} s |", flush=True)
