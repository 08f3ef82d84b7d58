"""Data: loaders for real CT layouts, the phantom, preprocessing, the slice store, downloads, the training
dataset with its prior views, acquisition augmentation and the train/val/test splits.
"""
