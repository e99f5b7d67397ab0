"""exme.report"""
