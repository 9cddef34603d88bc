"""Data tools: TFRecord conversion, download, the built-in Shepard-Metzler renderer, importing your own scenes."""
