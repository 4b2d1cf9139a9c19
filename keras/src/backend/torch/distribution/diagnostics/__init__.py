"""What a distribution did: the layout report after the first step
(`layout_report`) and `describe`, which also plans meshes larger than the
machine."""
