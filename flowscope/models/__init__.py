"""The nets the studies build and the init schemes they (and ``fs.reinit``) apply."""
