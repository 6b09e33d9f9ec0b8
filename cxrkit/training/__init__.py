"""Training the demonstration models on synthetic lesions (see ``python -m cxrkit.train --help``)."""
