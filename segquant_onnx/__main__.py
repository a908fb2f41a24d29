import sys

from segquant_onnx.cli import main

sys.exit(main())
