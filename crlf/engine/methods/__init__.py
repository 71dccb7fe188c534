"""Self-supervised methods: the interface and registry (base.py) and one module per method, each registered on import.

    from crlf.engine.methods import SimCLR, SimCLRConfig
    method = SimCLR(my_backbone, SimCLRConfig(temperature=0.2), feature_dim=512)

See base.py for the interface; crlf/catalog.py is the torch-free table of names and options the CLI reads.
"""

# ruff: noqa: I001 - registered in the order the CLI lists them
from crlf.engine.methods.base import REGISTRY, Method, catalog, get, opt, register
from crlf.engine.methods.simclr import SimCLR, SimCLRConfig
from crlf.engine.methods.moco import MoCo, MoCoConfig
from crlf.engine.methods.byol import BYOL, BYOLConfig
from crlf.engine.methods.simsiam import SimSiam, SimSiamConfig
from crlf.engine.methods.barlow import BarlowConfig, BarlowTwins
from crlf.engine.methods.vicreg import VICReg, VICRegConfig
from crlf.engine.methods.dino import DINO, DINOConfig
from crlf.engine.methods.swav import SwAV, SwAVConfig
from crlf.engine.methods.distill import Distill, DistillConfig
from crlf.engine.methods.mae import MAE, MAEConfig
from crlf.engine.methods.ibot import IBOT, IBOTConfig

__all__ = [
    "BYOL", "DINO", "REGISTRY", "BYOLConfig", "BarlowConfig", "BarlowTwins", "DINOConfig", "Method", "MoCo",
    "MoCoConfig", "SimCLR", "SimCLRConfig", "SimSiam", "SimSiamConfig", "SwAV", "SwAVConfig", "VICReg",
    "VICRegConfig", "Distill", "DistillConfig", "MAE", "MAEConfig", "IBOT", "IBOTConfig",
    "catalog", "get", "opt", "register",
]  # fmt: skip
