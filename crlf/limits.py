"""Bounds shared by the settings (which reject values past them at parse time) and the library (which checks what
it reads from files against them). Torch-free and pydantic-free, so both layers import it."""

MIN_IMAGE_SIZE = 8  # the encoder's smallest side
MAX_IMAGE_SIZE = 4096
MAX_SEED = 2**32 - 1  # what NumPy and scikit-learn accept; torch's per-epoch seeds are derived from it
MAX_WIDTH = 16384  # projection head widths (wide heads in the literature: 8192)
MAX_EPOCHS = 1_000_000
MAX_BATCH = 2**20  # batch sizes, and k neighbours
MAX_SCALAR = 1e30  # learning rates: larger values overflow float32 in the optimizer's step
