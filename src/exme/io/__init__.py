"""exme.io"""
