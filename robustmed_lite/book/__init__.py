"""Book and workshop support: the shipped fast-profile runs, the notebooks' setup cell, runs the chapters train
or restore, the workshop's checks and the environment doctor.
"""
