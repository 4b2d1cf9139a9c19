"""PyTorch modules laid out by a `LayoutMap`: tensor-parallel plans
(`plans`) and wrapped modules in Keras models (`wrapped_modules`)."""
