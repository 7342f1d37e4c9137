"""Converts LPIPS (VGG16) weights (torchvision vgg16 + lpips vgg.pth) to safetensors.

The command itself is `diffjax.cli.convert_lpips` (also installed as `diffjax-convert-lpips`);
see its docstring or `--help` for the flags.
"""

from diffjax.cli.convert_lpips import entry

if __name__ == "__main__":
    entry()
