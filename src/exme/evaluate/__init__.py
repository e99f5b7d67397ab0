"""exme.evaluate"""
