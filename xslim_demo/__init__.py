"""The shipped demo teacher: a class-conditional rectified-flow HunyuanVideo-architecture DiT trained on
Fashion-MNIST, whose weights load both in diffusers and through ComfyUI's own UNETLoader."""

from .latents import image_to_latent, latent_to_image
from .teacher import CLASSES, DemoTeacher, default_weights_path, load_teacher

__all__ = ["CLASSES", "DemoTeacher", "default_weights_path", "image_to_latent", "latent_to_image", "load_teacher"]
