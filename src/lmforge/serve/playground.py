"""The playground page served at /: a prompt box, the main sampling options, and the text as it streams in.

Plain HTML and JavaScript, no build step and no outside resources. It calls POST /v1/completions with
stream=true and reads the server-sent events with fetch (EventSource cannot POST). Kept as a string here
so it ships inside the Python package. {{MODEL}} is replaced by the model id.

A classifier has no playground: / shows CLASSIFIER_NOTE_HTML, which says how to call POST /v1/classify; an
encoder, ENCODER_NOTE_HTML (POST /v1/embeddings, POST /v1/fill-mask).
"""

PLAYGROUND_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>lmforge playground</title>
<style>
  body { font: 15px/1.4 system-ui, sans-serif; max-width: 52rem; margin: 2rem auto; padding: 0 1rem; }
  textarea, pre { width: 100%; box-sizing: border-box; font: 14px/1.4 ui-monospace, monospace; }
  textarea { height: 6rem; }
  pre { white-space: pre-wrap; background: #f4f4f4; padding: .75rem; min-height: 6rem; }
  .row { display: flex; flex-wrap: wrap; gap: .75rem; margin: .5rem 0; align-items: end; }
  label { display: flex; flex-direction: column; font-size: 12px; color: #444; }
  input { width: 7rem; }
  #status { color: #666; font-size: 12px; }
  .prompt { color: #777; }
</style>
</head>
<body>
<h1>lmforge playground</h1>
<p>Model: <code id="model">{{MODEL}}</code></p>
<textarea id="prompt" placeholder="Text to continue">ROMEO:</textarea>
<div class="row">
  <label>max tokens <input id="max_tokens" type="number" min="1" value="100"></label>
  <label>temperature <input id="temperature" type="number" min="0" step="0.1" value="0.8"></label>
  <label>top p <input id="top_p" type="number" min="0.01" max="1" step="0.05" value="1"></label>
  <label>seed <input id="seed" type="number" min="0" placeholder="random"></label>
  <label>stop <input id="stop" type="text" placeholder="none"></label>
  <label>API key <input id="api_key" type="password" placeholder="if required"></label>
  <button id="generate">Generate</button>
  <button id="cancel" disabled>Stop</button>
</div>
<pre id="output"></pre>
<div id="status"></div>
<script>
const $ = (id) => document.getElementById(id);
let controller = null;

function request() {
  const body = { prompt: $("prompt").value, max_tokens: Number($("max_tokens").value),
                 temperature: Number($("temperature").value), top_p: Number($("top_p").value), stream: true };
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  if ($("stop").value !== "") body.stop = $("stop").value.replace(/\\\\n/g, "\\n");
  return body;
}

async function generate() {
  const out = $("output"), status = $("status");
  out.innerHTML = "";
  const prompt = document.createElement("span");
  prompt.className = "prompt";
  prompt.textContent = $("prompt").value;
  const text = document.createElement("span");
  text.id = "completion";
  out.append(prompt, text);
  status.textContent = "generating...";
  controller = new AbortController();
  $("generate").disabled = true; $("cancel").disabled = false;
  const headers = { "Content-Type": "application/json" };
  if ($("api_key").value) headers["Authorization"] = "Bearer " + $("api_key").value;
  try {
    const response = await fetch("/v1/completions", { method: "POST", headers, body: JSON.stringify(request()),
                                                      signal: controller.signal });
    if (!response.ok) {
      const error = await response.json().catch(() => ({}));
      throw new Error(response.status + ": " + ((error.error && error.error.message) || response.statusText));
    }
    const reader = response.body.getReader(), decoder = new TextDecoder();
    let buffer = "", finish = null;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\\n\\n")) >= 0) {
        const line = buffer.slice(0, cut).trim();
        buffer = buffer.slice(cut + 2);
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") continue;
        const event = JSON.parse(data);
        if (event.error) throw new Error(event.error.message);
        for (const choice of event.choices) {
          text.textContent += choice.text;
          if (choice.finish_reason) finish = choice.finish_reason;
        }
      }
    }
    status.textContent = "done (" + (finish || "?") + ")";
  } catch (e) {
    status.textContent = e.name === "AbortError" ? "stopped" : "error " + e.message;
  } finally {
    $("generate").disabled = false; $("cancel").disabled = true; controller = null;
  }
}

$("generate").addEventListener("click", generate);
$("cancel").addEventListener("click", () => controller && controller.abort());
</script>
</body>
</html>
"""


def _note(kind: str, body: str) -> str:
    """The page at / of a model without a playground: what it is and how to call it ({{MODEL}}: its name)."""
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>lmforge {kind}</title>
<style>body {{ font: 15px/1.4 system-ui, sans-serif; max-width: 52rem; margin: 2rem auto; padding: 0 1rem; }}</style>
</head>
<body>
<h1>lmforge {kind}</h1>
<p>Model: <code>{{{{MODEL}}}}</code></p>
{body}
</body>
</html>
"""


CLASSIFIER_NOTE_HTML = _note("classifier", """<p>This model classifies text; it has no playground. Ask for labels with \
<code>POST /v1/classify</code>:</p>
<pre>curl http://HOST:PORT/v1/classify -H 'Content-Type: application/json' \\
     -d '{"input": ["a text", "another text"], "top_k": 2}'</pre>
<p><code>GET /v1/models</code> lists the labels.</p>""")

REWARD_NOTE_HTML = _note("reward model", """<p>This model is a reward model: it scores a prompt's completions and \
writes none; it has no playground. Ask for each completion's reward with <code>POST /v1/reward</code> (the higher, the \
more preferred):</p>
<pre>curl http://HOST:PORT/v1/reward -H 'Content-Type: application/json' \\
     -d '{"input": [{"prompt": "Who wrote Hamlet?", "completion": "Shakespeare."}]}'</pre>""")

ENCODER_NOTE_HTML = _note("encoder", """<p>This model is an encoder: it reads text from both sides and does not write \
any; it has no playground. Ask for a vector per text with <code>POST /v1/embeddings</code>:</p>
<pre>curl http://HOST:PORT/v1/embeddings -H 'Content-Type: application/json' \\
     -d '{"input": ["a text", "another text"]}'</pre>
<p>and for the likeliest tokens in each mask with <code>POST /v1/fill-mask</code> (Hugging Face's fill-mask
answer):</p>
<pre>curl http://HOST:PORT/v1/fill-mask -H 'Content-Type: application/json' \\
     -d '{"inputs": "to be or not to &lt;MASK&gt;e", "parameters": {"top_k": 3}}'</pre>""")
