/// The version of vkflex.
public let vkflexVersion = "0.1.0"
