"""yolo-compress: compress Darknet YOLO detectors; cfg + weights in, cfg + weights out."""
from __future__ import annotations

from compress.darknet.cfg import Block, Cfg, format_cfg, parse_cfg, read_cfg, write_cfg
from compress.base.errors import CompressError
from compress.darknet.model import DarknetModel, build_model
from compress.darknet.persist import load, save
from compress.recipe import run_recipe

__all__ = ["load", "save", "Block", "Cfg", "parse_cfg", "read_cfg", "format_cfg", "write_cfg", "build_model",
           "DarknetModel", "CompressError", "run_recipe"]
__version__ = "0.1.0"
