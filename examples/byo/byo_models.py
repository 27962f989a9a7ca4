"""Your own model for `hvdscale train`: a factory that gets the validated Config and returns a
model of the recipe's framework.

    model: {name: "byo_models:build"}      # this file's directory on PYTHONPATH

torch: an nn.Module taking float NCHW images [N, C, H, W]; Keras: a keras.Model taking NHWC
images [N, H, W, C]. Both return logits [N, data.num_classes]. hvdscale checks the type and
the output shape on a batch of two before training, and names this entry point if either is
wrong. Import the framework inside the factory, so that validating a recipe stays cheap.
"""


def build(cfg):
    size, channels, classes = cfg.data.image_size, cfg.in_channels, cfg.data.num_classes
    if cfg.framework == "torch":
        from torch import nn
        return nn.Sequential(
            nn.Conv2d(channels, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(16 * (size // 2) ** 2, 64), nn.ReLU(),
            nn.Linear(64, classes))
    import keras
    from keras import layers
    return keras.Sequential([
        keras.Input((size, size, channels)),
        layers.Conv2D(16, 3, padding="same", activation="relu"), layers.MaxPooling2D(2),
        layers.Flatten(), layers.Dense(64, activation="relu"), layers.Dense(classes)])
