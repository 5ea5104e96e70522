import sys

from mnist_study.cli import main

sys.exit(main())
