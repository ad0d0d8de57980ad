"""The oracle's class reader: dog, cat or bird from one animal's silhouette.

The dense oracle net reads colours and patterns well, but a pixel of body looks the same on a dog
and a cat; the class is in the ears, tail, beak and proportions. So each animal the dense net
finds is cropped (its box plus a margin, resized to 32x32, with its mask as a fourth channel) and
classified whole by this small CNN. It trains on a CPU in a few minutes:

    python -m bench.toyworld.shape --out assets/toyworld/oracle_shape.pt

Training crops come from rendered scenes, half of them passed through the toy model's VAE so the
reader also knows the softer edges of generated images; 30% of the animals wear a random belly
(the pets' marking), which must not change the class.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from PIL import Image
from torch import nn

from bench.toyworld.world import CLASSES, random_scene, render, with_random_bellies

CROP = 32
MARGIN = 2


def crop_animal(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """`[4, 32, 32]` float: the animal's box (plus margin) as RGB in [-1, 1] and its mask."""
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    x0, x1 = max(0, xs.min() - MARGIN), min(w, xs.max() + 1 + MARGIN)
    y0, y1 = max(0, ys.min() - MARGIN), min(h, ys.max() + 1 + MARGIN)
    side = max(x1 - x0, y1 - y0)  # square crop keeps the proportions that tell the classes apart
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
    rgb = Image.fromarray(image).crop(box).resize((CROP, CROP), Image.BILINEAR)
    alpha = Image.fromarray(mask.astype(np.uint8) * 255).crop(box).resize((CROP, CROP), Image.BILINEAR)
    out = np.concatenate([np.asarray(rgb, np.float32) / 127.5 - 1, np.asarray(alpha, np.float32)[..., None] / 255], -1)
    return out.transpose(2, 0, 1)


class ShapeNet(nn.Module):
    def __init__(self):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))

        self.features = nn.Sequential(block(4, 16), block(16, 32), block(32, 64), block(64, 64))
        self.classify = nn.Linear(64 * 2 * 2, len(CLASSES))

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(crops).flatten(1))


def training_crops(scenes: int, seed: int, vae=None) -> tuple[np.ndarray, np.ndarray]:
    """Crops and class labels of every animal in `scenes` random scenes (optionally VAE-softened)."""
    rng = np.random.default_rng(seed)
    belly_rng = np.random.default_rng([seed, 7])
    crops, labels = [], []
    for _ in range(scenes):
        scene = with_random_bellies(random_scene(rng), belly_rng)  # a belly must not change the class read
        image, instance = render(scene)
        if vae is not None:
            image = vae_roundtrip(vae, image)
        for index, animal in enumerate(scene.animals, start=1):
            mask = instance == index
            if mask.sum() >= 12:
                crops.append(crop_animal(image, mask))
                labels.append(CLASSES.index(animal.look.cls))
    return np.stack(crops), np.array(labels)


@torch.no_grad()
def vae_roundtrip(vae, image: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1
    y = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    return ((y[0].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()


def main() -> None:
    from diffusers import AutoencoderKL

    from bench.toyworld.evaluate import MODEL_DIR

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="assets/toyworld/oracle_shape.pt")
    parser.add_argument("--scenes", type=int, default=4000)
    parser.add_argument("--steps", type=int, default=2000)
    args = parser.parse_args()
    torch.manual_seed(0)
    started = time.time()
    vae = AutoencoderKL.from_pretrained(MODEL_DIR / "vae").float().eval()
    clean = training_crops(args.scenes, seed=10)
    soft = training_crops(args.scenes // 2, seed=11, vae=vae)
    crops = torch.from_numpy(np.concatenate([clean[0], soft[0]]))
    labels = torch.from_numpy(np.concatenate([clean[1], soft[1]]))
    held_out = training_crops(500, seed=12, vae=vae)
    print(f"{len(crops)} crops in {time.time() - started:.0f} s", flush=True)
    net = ShapeNet()
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 2e-3, total_steps=args.steps)
    for step in range(args.steps):
        idx = torch.randint(0, len(crops), (128,))
        x = crops[idx]
        x = torch.where(torch.rand(len(x), 1, 1, 1) < 0.5, x.flip(-1), x)
        x = x + 0.03 * torch.randn_like(x)
        loss = nn.functional.cross_entropy(net(x), labels[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 250 == 0:
            print(f"step {step} loss {loss.item():.4f} ({time.time() - started:.0f} s)", flush=True)
    net.eval()
    with torch.no_grad():
        accuracy = (net(torch.from_numpy(held_out[0])).argmax(1).numpy() == held_out[1]).mean()
    print(f"held-out accuracy on VAE-softened renders: {accuracy:.4f} ({len(held_out[1])} animals)")
    torch.save(net.state_dict(), args.out)


if __name__ == "__main__":
    main()
