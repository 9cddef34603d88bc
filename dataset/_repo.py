"""`python dataset/<script>.py` runs with dataset/ first on sys.path: this puts the repository's folder (one up)
there too, so that the data tools import the project's modules as train.py does. Imported as `dataset.<script>`
(from train.py or the tests), the scripts do not need it."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
