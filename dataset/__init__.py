"""Data tools: TFRecord conversion, download, and the built-in Shepard-Metzler renderer."""
