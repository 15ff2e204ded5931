"""Loading a Hugging Face model directory, the text it is checked on, and calibration statistics."""
