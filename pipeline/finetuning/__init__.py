"""Stage three: train a head run end to end with its backbone, on images or cached activations."""
