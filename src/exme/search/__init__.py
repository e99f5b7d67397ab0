"""exme.search"""
