import os
import sys
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
warnings.filterwarnings("ignore", category=DeprecationWarning)
# The suite runs one pytest worker per core (-n auto); more torch threads per worker only compete.
torch.set_num_threads(1)
