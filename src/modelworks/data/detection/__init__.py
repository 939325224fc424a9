"""Object-detection data: VOC/COCO/YOLO readers into one target format, the fmnist-scenes generator, format
writers, letterboxed batches with padded targets, and box-aware batch augmentation."""
