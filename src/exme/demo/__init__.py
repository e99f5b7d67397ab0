"""exme.demo"""
