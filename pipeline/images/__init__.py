"""Images to pixels: formats and headers (formats.py), reading each file once with the decoder of
this process (reading.py), the tf.data path (decode_tf.py) and the TensorFlow-free path
(decode_pillow.py). The names of 0.1's pipeline/images.py are found here too, loaded on use."""

_OLD_NAMES = {  # name -> the module that defines it now
    **dict.fromkeys(("IMAGE_EXTENSIONS", "RESIZE_METHOD", "MAX_IMAGE_SIZE", "DEFAULT_MAX_PIXELS", "is_image_file",
                     "image_dimensions", "too_large_error", "unreadable_reason"), "formats"),
    **dict.fromkeys(("decoder_identity", "unchecked_reason", "header_dimensions", "decode_one", "ReadImage",
                     "read_and_decode", "EncodedImages"), "reading"),
    **dict.fromkeys(("decode_and_resize", "decode_bytes_and_resize", "resize_like_extract", "labelled_batches"),
                    "decode_tf"),
}


def __getattr__(name: str):  # noqa: ANN202 - PEP 562
    if name in _OLD_NAMES:
        import importlib

        return getattr(importlib.import_module(f"pipeline.images.{_OLD_NAMES[name]}"), name)
    raise AttributeError(f"module 'pipeline.images' has no attribute {name!r}")
