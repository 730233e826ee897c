//! `hello`: the smallest useful plugin, quoted by the docs.

use plugin_api::{export_plugin, Context, CreateContext, Methods, Plugin, PluginError};
use serde::{Deserialize, Serialize};

/// Configuration from the manifest's `[config]` table.
#[derive(Deserialize)]
#[serde(default)]
struct Config {
    greeting: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            greeting: "Hello".into(),
        }
    }
}

/// Input of `greet`.
#[derive(Deserialize)]
struct Greet {
    name: String,
}

/// Output of `greet`.
#[derive(Serialize)]
struct Greeting {
    message: String,
}

/// The plugin instance.
struct Hello {
    greeting: String,
}

impl Plugin for Hello {
    fn create(ctx: &CreateContext<'_>) -> Result<Self, PluginError> {
        let config: Config = ctx.config()?;
        ctx.info(format!("created with greeting {:?}", config.greeting));
        Ok(Hello {
            greeting: config.greeting,
        })
    }

    fn methods(methods: &mut Methods<Self>) {
        methods
            .add("greet", |this: &Hello, ctx: &Context<'_>, input: Greet| {
                if input.name.is_empty() {
                    return Err(PluginError::new("name must not be empty"));
                }
                ctx.debug(format!("greeting {}", input.name));
                Ok(Greeting {
                    message: format!("{}, {}!", this.greeting, input.name),
                })
            })
            .add_raw("echo", |_: &Hello, _: &Context<'_>, input: &[u8]| {
                Ok(input.to_vec())
            });
    }
}

export_plugin!(Hello);
