def robust_scaling(): pass
def scale_by_depth(): pass
def scale_by_width(): pass
