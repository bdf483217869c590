"""`python -m objectives locate|download`: where Fashion-MNIST is, or fetch it (see objectives.data)."""

import sys

from objectives.data import main

sys.exit(main(sys.argv[1:]))
