"""Images to pixels: formats and headers, the tf.data path and the TensorFlow-free (Pillow) path."""
