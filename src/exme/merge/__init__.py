"""exme.merge"""
