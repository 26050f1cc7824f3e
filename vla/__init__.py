"""vla: Vision-Language-Action policies with Mixture-of-Experts and diffusion action heads."""
__version__ = "0.1.0"
