//! A small WebDriver client for chromedriver on 127.0.0.1: just the commands the page
//! test needs.

use std::error::Error;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine;
use serde_json::{Value, json};

pub type Result<T> = std::result::Result<T, Box<dyn Error + Send + Sync>>;

/// The key W3C WebDriver uses for element references.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

/// The flags Chromium runs with: headless, and quiet on a machine without network access
/// (without them it keeps trying to reach update and sync services).
const CHROMIUM_FLAGS: &[&str] = &[
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1200,900",
];

/// A chromedriver process that this test started; killed on drop.
pub struct Driver {
    process: Child,
    base: String,
    http: reqwest::Client,
}

impl Driver {
    /// Starts `chromedriver` on a free port of 127.0.0.1 and waits for its ready line.
    pub fn start(chromedriver: &Path) -> Result<Self> {
        let mut process = Command::new(chromedriver)
            .arg("--port=0")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let stdout = process.stdout.take().ok_or("chromedriver has no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let mut port = None;
        for line in lines.by_ref() {
            let line = line?;
            // "ChromeDriver was started successfully on port 36217."
            if let Some(rest) = line.split("started successfully on port ").nth(1) {
                port = Some(rest.trim_end_matches('.').trim().parse::<u16>()?);
                break;
            }
        }
        let Some(port) = port else {
            let _ = process.kill();
            let _ = process.wait();
            return Err("chromedriver exited without reporting its port".into());
        };
        // Keep reading its output so that a full pipe never blocks it.
        std::thread::spawn(move || lines.for_each(drop));
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(120))
            .build()?;
        Ok(Self {
            process,
            base: format!("http://127.0.0.1:{port}"),
            http,
        })
    }

    /// Opens a browser session with Chromium at `chromium` and a fresh profile in `profile`.
    pub async fn session(&self, chromium: &Path, profile: &Path) -> Result<Session<'_>> {
        let mut args: Vec<String> = CHROMIUM_FLAGS.iter().map(|s| (*s).to_owned()).collect();
        args.push(format!("--user-data-dir={}", profile.display()));
        let capabilities = json!({
            "capabilities": {
                "alwaysMatch": {
                    "browserName": "chrome",
                    "goog:chromeOptions": {"binary": chromium, "args": args},
                }
            }
        });
        let value = self.command("POST", "/session", Some(capabilities)).await?;
        let id = value["sessionId"]
            .as_str()
            .ok_or_else(|| format!("no session id in {value}"))?
            .to_owned();
        Ok(Session { driver: self, id })
    }

    async fn command(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
        let url = format!("{}{path}", self.base);
        let request = match method {
            "GET" => self.http.get(url),
            "DELETE" => self.http.delete(url),
            _ => self.http.post(url).json(&body.unwrap_or_else(|| json!({}))),
        };
        let response = request.send().await?;
        let status = response.status();
        let body: Value = response.json().await?;
        let value = body["value"].clone();
        if !status.is_success() {
            return Err(format!(
                "WebDriver {method} {path} failed ({status}): {} {}",
                value["error"], value["message"]
            )
            .into());
        }
        Ok(value)
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

/// One browser window.
pub struct Session<'a> {
    driver: &'a Driver,
    id: String,
}

/// Resolves when the element `selector` meets `condition` (`visible`, `enabled`, a
/// `data-state` from `values`, or text starting with `values[0]`), returning its text. A
/// MutationObserver checks again on every change of the page.
const WAIT_SCRIPT: &str = r#"
const [selector, condition, values, done] = arguments;
function check() {
  const element = document.querySelector(selector);
  if (!element) return null;
  const text = element.textContent;
  switch (condition) {
    case "visible": return element.hidden ? null : { text };
    case "enabled": return element.disabled ? null : { text };
    case "state": return values.includes(element.dataset.state) ? { text, state: element.dataset.state } : null;
    case "text": return text.startsWith(values[0]) ? { text } : null;
  }
  return null;
}
const now = check();
if (now) { done(now); return; }
const observer = new MutationObserver(() => {
  const result = check();
  if (result) { observer.disconnect(); done(result); }
});
observer.observe(document, { subtree: true, childList: true, attributes: true, characterData: true });
"#;

impl Session<'_> {
    fn path(&self, rest: &str) -> String {
        format!("/session/{}{rest}", self.id)
    }

    pub async fn goto(&self, url: &str) -> Result<()> {
        self.driver
            .command("POST", &self.path("/url"), Some(json!({ "url": url })))
            .await?;
        Ok(())
    }

    /// Sets how long [`Session::wait_for`] may wait.
    pub async fn set_script_timeout(&self, timeout: Duration) -> Result<()> {
        let body = json!({ "script": timeout.as_millis() as u64 });
        self.driver
            .command("POST", &self.path("/timeouts"), Some(body))
            .await?;
        Ok(())
    }

    pub async fn find(&self, selector: &str) -> Result<String> {
        let body = json!({ "using": "css selector", "value": selector });
        let value = self
            .driver
            .command("POST", &self.path("/element"), Some(body))
            .await?;
        value[ELEMENT_KEY]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("no element reference for {selector} in {value}").into())
    }

    /// Types `text` into the element; for a file input, `text` is the path of the file.
    pub async fn send_keys(&self, selector: &str, text: &str) -> Result<()> {
        let element = self.find(selector).await?;
        let path = self.path(&format!("/element/{element}/value"));
        self.driver
            .command("POST", &path, Some(json!({ "text": text })))
            .await?;
        Ok(())
    }

    pub async fn click(&self, selector: &str) -> Result<()> {
        let element = self.find(selector).await?;
        let path = self.path(&format!("/element/{element}/click"));
        self.driver.command("POST", &path, None).await?;
        Ok(())
    }

    pub async fn execute(&self, script: &str, args: Value) -> Result<Value> {
        let body = json!({ "script": script, "args": args });
        self.driver
            .command("POST", &self.path("/execute/sync"), Some(body))
            .await
    }

    /// Waits until `selector` meets `condition` (see [`WAIT_SCRIPT`]); returns its text and,
    /// for `state`, the state reached.
    pub async fn wait_for(
        &self,
        selector: &str,
        condition: &str,
        values: &[&str],
    ) -> Result<Value> {
        let body = json!({ "script": WAIT_SCRIPT, "args": [selector, condition, values] });
        self.driver
            .command("POST", &self.path("/execute/async"), Some(body))
            .await
            .map_err(|e| format!("waiting for {selector} to be {condition} {values:?}: {e}").into())
    }

    pub async fn set_window_size(&self, width: u32, height: u32) -> Result<()> {
        let body = json!({ "width": width, "height": height });
        self.driver
            .command("POST", &self.path("/window/rect"), Some(body))
            .await?;
        Ok(())
    }

    /// Takes a PNG screenshot of the window.
    pub async fn screenshot(&self) -> Result<Vec<u8>> {
        let value = self
            .driver
            .command("GET", &self.path("/screenshot"), None)
            .await?;
        let encoded = value.as_str().ok_or("the screenshot is not a string")?;
        Ok(base64::engine::general_purpose::STANDARD.decode(encoded)?)
    }

    /// Ends the session, which closes Chromium.
    pub async fn close(self) -> Result<()> {
        self.driver.command("DELETE", &self.path(""), None).await?;
        Ok(())
    }
}
