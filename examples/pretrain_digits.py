"""Pretrain on scikit-learn's digits from Python, then embed images with the saved encoder.

python examples/pretrain_digits.py
"""

from crlf import PretrainSettings, load_data, load_encoder, pretrain

settings = PretrainSettings(
    data="digits", epochs=3, batch_size=256, device="cpu", out="runs/digits-py", head_hidden=512
)
summary = pretrain(settings, force=True)
print(f"final loss {summary['final_loss']:.3f} at {summary['images_per_s']:.0f} images/s")

encoder = load_encoder(summary["encoder"])  # an Encoder: backbone, normalisation, image size, backbone spec
images = load_data(settings).images[:8]  # uint8 (8, 3, 16, 16)
features = encoder.embed(images)  # resized and normalised as crlf extract does; also PIL images, arrays, paths
print("features:", tuple(features.shape))  # (8, 512)
