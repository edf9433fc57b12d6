// The API reference page (/api/docs): Swagger UI over the balancer's own document.
// "Try it out" calls the balancer from this page (same origin, JSON bodies); a token
// entered with "Authorize" is sent as `Authorization: Bearer <token>`.
"use strict";
window.ui = SwaggerUIBundle({
  url: "/api/openapi.json",
  dom_id: "#swagger-ui",
  deepLinking: true,
  tryItOutEnabled: false,
  persistAuthorization: false,
  supportedSubmitMethods: ["get", "post"],
  validatorUrl: null,
  defaultModelsExpandDepth: 0,
});
