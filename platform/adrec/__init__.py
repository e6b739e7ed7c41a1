"""adrec: personalized ad recommendation on Ray.

Importing the package has no side effects: it never starts Ray and never prints.
"""

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
