"""File names of canopy-height outputs, shared by the light command parser and the mapping that writes them."""

OUT_SUFFIX = "_chm.tif"  # scenes/a.tif -> maps/a_chm.tif
