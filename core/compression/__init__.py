"""Compression: TFMOT stages on a trained model (stages), TFLite conversion and scoring (tflite), the command."""
