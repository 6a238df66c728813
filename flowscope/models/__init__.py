"""The nets the studies build and the init schemes they (and ``fs.reinit``) apply."""

from flowscope.models import resnets as resnets  # registers the residual nets ("resmlp")
