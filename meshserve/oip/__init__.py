"""Generated stubs of the Open Inference Protocol v2 (proto package `inference`); see protos/meshserve/oip/."""
