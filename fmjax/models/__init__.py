"""The model families, one file each: config dataclass with presets, the modules, counts.

  gpt      GPT, a decoder-only causal language model (GPTConfig, presets "tiny" .. "gpt2_medium")
  decoder  Llama, Mistral, Qwen2/3 and Gemma 1/2/3 decoders (DecoderConfig; from Hugging Face
           through fmjax.hf.from_pretrained)
  bert     BERT encoder with pretraining, masked-LM, classification and QA heads (BertConfig)
  vit      ViT image classifier over patches (ViTConfig)
  detr     DETR object detector on a ViT backbone (DETRConfig; loss in fmjax.detection)
  seq2seq  encoder-decoder Transformer for translation, and an image captioner (Seq2SeqConfig)
  vqvae    VQ-VAE image tokenizer: images <-> a grid of codebook ids (VQConfig; EMA codebook
           maths in fmjax.codebook)
  text_to_image  caption -> image codes: seq2seq's encoder and decoder with 2-D grid positions
           (TextToImageConfig; classifier-free guidance in fmjax.guidance)
  clip     CLIP dual encoder: ViT image tower, Transformer text tower, contrastive loss,
           zero-shot classification (CLIPConfig)

Each file assembles the shared layers of fmjax.layers and fmjax.transformer; how a model runs
(kernel, remat, scan, dtypes, dropout) is an fmjax.runtime.Runtime, not part of its config.
"""
