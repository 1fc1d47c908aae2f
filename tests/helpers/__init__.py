"""Test helpers: a boring LightningModule around any backbone, random image data."""
