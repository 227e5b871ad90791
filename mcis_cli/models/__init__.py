"""Networks as plain nn.Modules, with no I/O: backbone (VGG16-D1), mcis (classifier), deeplab."""
